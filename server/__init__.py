"""cotap.server"""

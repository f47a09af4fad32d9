"""cotap.clients"""

"""cotap.export"""

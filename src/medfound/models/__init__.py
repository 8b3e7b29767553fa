"""medfound.models"""

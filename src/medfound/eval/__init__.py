"""medfound.eval"""

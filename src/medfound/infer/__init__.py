"""medfound.infer"""

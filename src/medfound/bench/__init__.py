"""medfound.bench"""

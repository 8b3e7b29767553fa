"""medfound.train"""

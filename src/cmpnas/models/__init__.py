"""cmpnas.models"""

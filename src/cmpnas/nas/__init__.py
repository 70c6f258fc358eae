"""cmpnas.nas"""

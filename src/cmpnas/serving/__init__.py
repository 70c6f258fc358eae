"""cmpnas.serving"""

"""cmpnas.training"""

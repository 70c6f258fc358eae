"""cmpnas.compat"""

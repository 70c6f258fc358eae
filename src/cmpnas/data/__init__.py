"""cmpnas.data"""

"""cmpnas.evaluation"""

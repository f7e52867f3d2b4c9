"""jaxeff.decode"""

"""jaxeff.steer"""

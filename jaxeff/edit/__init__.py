"""jaxeff.edit"""

"""The ``redi`` command line: the top layer, which may import every other."""

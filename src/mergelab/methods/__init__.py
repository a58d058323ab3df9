"""Merge methods: the contract (``spec``, ``context``), one module per method family, and the name -> spec table
(``registry.METHODS``). Nothing is imported here, so that the contract can be used without loading every method.
"""

"""Pruning methods: the method base (:mod:`.base`) and prunespec's built-in methods (:mod:`.builtin`)."""

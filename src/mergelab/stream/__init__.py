"""Streaming a plan through a method into shards: ``options`` (how to run), ``schedule`` (each tensor job's
execution mode, decided once, and its pieces), ``compute`` (a piece through the method, tile by tile),
``statistics`` (fractions of output elements equal to each input), ``pipeline`` (reader threads, compute lanes,
writer thread). ``mergelab.engine`` runs the whole road around it."""

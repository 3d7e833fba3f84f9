"""One module per claim, each defining ``CLAIM`` (a :class:`pipelines.reproduce.Claim`)."""

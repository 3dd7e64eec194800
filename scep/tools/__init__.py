"""The `scep` command line and its tools: the SCEP client, doctor."""

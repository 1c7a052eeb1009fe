"""The open-model ecosystem: dated Hub snapshots of tracked organisations' models and the report on them.

`snapshot` takes a snapshot through `huggingface_hub` (`hubapi` adds the page cache), `policy` decides
what counts as a first-party model, `regions` maps publishers to regions, `metrics` computes adoption,
derivative shares, the Relative Adoption Metric and the truly open share, `report` draws and writes
them, and `synthetic` makes seeded synthetic populations and serves them as a loopback Hub.
"""

"""Results: the DuckDB ledger of every evaluation, bootstrap intervals, the paper's tables as Polars frames, the
claims, two specs compared, and the report under reports/ (tables in Markdown, CSV and LaTeX; plots; image grids).

    from flowopd.results import tables, claims
    tables.main_table()          # the latest eval run of every model label, with 95% intervals
    claims.claims()              # the paper's claims: holds / fails / unresolved
"""

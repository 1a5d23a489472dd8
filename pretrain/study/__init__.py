"""The optimizer study behind ``tools/compare_optimizers.py``: which optimizers, how one run is
executed (``worker``), and how the results become tables, plots and a report (``report``)."""

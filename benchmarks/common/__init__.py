"""What every benchmark script shares: built-in models (``models``), the providers timed
on them (``providers``), how an update is measured (``timing``), and what a run leaves
behind: machine description, JSON, table, plot (``report``)."""

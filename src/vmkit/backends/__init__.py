"""Where machines run. ``local``: this host, through supervisors (the only backend so far)."""

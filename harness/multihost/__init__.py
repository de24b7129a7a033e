"""Several host processes sharing one Redis against one mock E2B, with a host killed
mid-run: the lab setup that shows the gates hold across hosts."""

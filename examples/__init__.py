"""The example specs, shipped in the wheel as the package `harness.examples` (setup.py maps it
onto this directory) so the installed `simulate` reads these files and no copy of them."""

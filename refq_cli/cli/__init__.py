"""The ``refq`` command line. Thin: parsing and printing; the work happens in the library."""

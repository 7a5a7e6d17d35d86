"""Stand-in for PythonQt's qt module: the module file only names it at load time."""

"""Stand-in for PythonQt's ctk module: the module's Qt helpers only name it at load time."""

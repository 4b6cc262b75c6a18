"""One module per lab (``labNN.py``), each registering that lab's exercise checks."""

"""Real-browser tests of the course in JupyterLab (Playwright driving Debian's Chromium)."""

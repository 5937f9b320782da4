"""Repo-root conftest: marks the pytest rootdir; shared fixtures belong here (pytest.ini puts the root on sys.path)."""

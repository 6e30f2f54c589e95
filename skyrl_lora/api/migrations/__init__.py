"""The API database's schema history (Alembic). ``Database`` upgrades to the newest revision on start."""

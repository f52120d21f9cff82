"""The local analysis stage: run bundles in, tables, plots and a report out. Reads bundles only."""

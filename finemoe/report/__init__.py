"""Figures and reports built from run tables and fitted laws."""

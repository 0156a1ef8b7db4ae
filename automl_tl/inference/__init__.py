"""A saved artifact and everything that runs it: preprocessing, prediction, export."""

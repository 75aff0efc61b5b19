"""Tests of the sans-I/O String-Phone protocol core."""

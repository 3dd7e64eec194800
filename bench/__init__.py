"""Enrollment throughput benchmark: the product's server against micromdm's scepserver on the same machine."""

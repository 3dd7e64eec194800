"""Checks of the Azure deployment (infra/)."""

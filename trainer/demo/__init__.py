"""The demo: synthetic tasks and a small from-scratch backbone for the quickstart."""

"""The demo and the papers' experiment protocols, their executors and reports."""

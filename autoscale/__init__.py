"""Autoscaling policy and planning per stage kind (see the 'Staying up' issue)."""

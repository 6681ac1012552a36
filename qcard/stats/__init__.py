"""Statistics of accuracies (torch-free): per-sample outcomes, intervals, paired significance tests."""

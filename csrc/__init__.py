"""Sources of lrfree's compiled extension (C++/CUDA), installed as data for the first-use build."""

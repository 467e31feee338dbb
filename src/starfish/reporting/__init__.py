"""Reports and plots of runs and compare grids."""

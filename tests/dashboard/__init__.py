"""app/dashboard/: pages, HTTP and a real browser."""

"""The web console (/ui/): sessions in sessions.py, its HTTP side in web.py, its pages in static/."""

"""The browser dashboard the proxy serves at /dashboard: cluster view, charts, logs, chat playground, actions."""
from gridserve.proxy.dashboard.routes import Dashboard, add_dashboard_routes

__all__ = ["Dashboard", "add_dashboard_routes"]

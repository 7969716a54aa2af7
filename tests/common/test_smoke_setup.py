def test_health_reports_database_and_redis(anon, db):
    r = anon.get("/health/")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}

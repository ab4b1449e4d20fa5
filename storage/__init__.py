"""raftmesh.storage"""

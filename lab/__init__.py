"""raftmesh.lab"""
